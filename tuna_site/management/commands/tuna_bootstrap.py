import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Create a local admin user if there is none (prints the credentials and API token once)."

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("Admin user exists; leaving it alone.")
            return
        username = os.environ.get("TUNA_ADMIN_USER") or "admin"
        password = os.environ.get("TUNA_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        user = User.objects.create_superuser(username=username, email="", password=password)
        token, _ = Token.objects.get_or_create(user=user)
        shown = password if not os.environ.get("TUNA_ADMIN_PASSWORD") else "(from TUNA_ADMIN_PASSWORD)"
        self.stdout.write(self.style.SUCCESS("Created the local admin user. Save these now; they are shown once:"))
        self.stdout.write(f"  user name: {username}\n  password:  {shown}\n  API token: {token.key}")
