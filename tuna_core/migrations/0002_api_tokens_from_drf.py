"""Keys made before the upgrade keep working: each of Django REST framework's plaintext tokens becomes an
ApiToken row holding only its digest, and the plaintext table is emptied (dropped once that app is no longer
installed), so the database holds no usable key afterwards."""

import hashlib
from datetime import UTC

from django.db import migrations
from django.utils import timezone
from django.utils.dateparse import parse_datetime

OLD_TABLE = "authtoken_token"
OLD_NAME = "Key from before the upgrade"
OLD_PREFIX_CHARS = 7  # as many random characters as a new key shows after "tuna_"


def hash_old_tokens(apps, schema_editor):
    connection = schema_editor.connection
    if OLD_TABLE not in connection.introspection.table_names():
        return
    ApiToken = apps.get_model("tuna_core", "ApiToken")
    table = schema_editor.quote_name(OLD_TABLE)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {schema_editor.quote_name('key')}, user_id, created FROM {table}")
        rows = cursor.fetchall()
    for key, user_id, created in rows:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        if ApiToken.objects.filter(digest=digest).exists():
            continue
        token = ApiToken.objects.create(user_id=user_id, name=OLD_NAME, prefix=key[:OLD_PREFIX_CHARS], digest=digest)
        if isinstance(created, str):
            created = parse_datetime(created)
        if created is not None:
            if timezone.is_naive(created):
                created = timezone.make_aware(created, UTC)
            ApiToken.objects.filter(pk=token.pk).update(created_at=created)
    from django.apps import apps as installed

    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("PRAGMA secure_delete = ON")  # the freed pages are zeroed, not left in the file
        cursor.execute(f"DELETE FROM {table}")
        if not installed.is_installed("rest_framework.authtoken"):
            # The app is gone: its table and its migration records go too, so adding it back starts clean.
            cursor.execute(f"DROP TABLE {table}")
            cursor.execute("DELETE FROM django_migrations WHERE app = %s", ["authtoken"])
    if not installed.is_installed("rest_framework.authtoken"):
        # Nor do its content type and permissions linger in the admin's permission lists.
        apps.get_model("contenttypes", "ContentType").objects.filter(app_label="authtoken").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("tuna_core", "0001_api_tokens"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(hash_old_tokens, migrations.RunPython.noop, elidable=True)]
