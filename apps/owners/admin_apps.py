"""`django.contrib.admin` with the platform's admin site (see apps.owners.admin_site).

Kept apart from the site module: INSTALLED_APPS imports this while the app registry is being
populated, before any model (or unfold's forms, which import one) may be imported.
"""

from django.contrib.admin.apps import AdminConfig


class PlatformAdminConfig(AdminConfig):
    default_site = "apps.owners.admin_site.PlatformAdminSite"
