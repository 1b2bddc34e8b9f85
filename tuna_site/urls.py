from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from tuna_core.errors import NotFoundApi
from tuna_site import token_views, views
from tuna_site.throttles import RateLimitedAdminAuthenticationForm

admin.site.login_form = RateLimitedAdminAuthenticationForm  # the admin's log-in is rate-limited like the site's

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("account/", token_views.account, name="account"),
    path("account/keys/", token_views.api_key_create, name="api-key-create"),
    path("account/keys/<int:pk>/rotate/", token_views.api_key_rotate, name="api-key-rotate"),
    path("account/keys/<int:pk>/revoke/", token_views.api_key_revoke, name="api-key-revoke"),
    path("admin/", admin.site.urls),
    path("api/schema", SpectacularAPIView.as_view(), name="api-schema"),
    # The split view serves its init script from a URL (?script): the CSP allows no inline script.
    path("docs", SpectacularSwaggerSplitView.as_view(url_name="api-schema"), name="api-docs"),
    path("", include("datasets_app.urls")),
    path("", include("training_app.urls")),
    path("", include("evaluation_app.urls")),
    path("", include("inference_app.urls")),
    path("", include("openai_api.urls")),
    re_path(r"^(api|v1)/", NotFoundApi.as_view()),
]
