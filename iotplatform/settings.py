"""Settings for iotplatform.

Every value comes from the environment through django-environ, with typed defaults that make the
embedded mode work on a fresh machine (SQLite, the embedded MQTT broker, Celery's filesystem
transport, the SQLite channel layer). Production switches each part by one variable; see
`.env.example` and `docs/configuration.md`. Bad values fail at start, not at first use.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse_lazy

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

VAR_DIR = Path(env.str("VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _embedded_secret(name: str, factory) -> str:
    """A secret generated once per checkout and kept in var/, for the embedded mode only.

    Production sets the variable; a missing one there is an error (see EMBEDDED below).
    """
    path = VAR_DIR / "embedded-secrets.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if name not in data:
        data[name] = factory()
        path.write_text(json.dumps(data, indent=2))
        path.chmod(0o600)
    return data[name]


def _new_field_key() -> str:
    from apps.core.crypto import generate_key

    return generate_key()


DEBUG = env.bool("DEBUG", default=False)
# EMBEDDED: no external service is configured; secrets may be generated locally.
EMBEDDED = env.bool("EMBEDDED", default=not env.str("DATABASE_URL", default=""))

SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not EMBEDDED:
        raise ImproperlyConfigured("SECRET_KEY must be set outside the embedded mode")
    SECRET_KEY = _embedded_secret("SECRET_KEY", lambda: secrets.token_urlsafe(50))

# Keys for secrets at rest; newest first. Independent of SECRET_KEY so that rotating one does
# not touch the other. Format: comma-separated "<key-id>:<base64 32-byte key>".
FIELD_ENCRYPTION_KEYS = env.list("FIELD_ENCRYPTION_KEYS", default=[])
if not FIELD_ENCRYPTION_KEYS:
    if not EMBEDDED:
        raise ImproperlyConfigured("FIELD_ENCRYPTION_KEYS must be set outside the embedded mode")
    FIELD_ENCRYPTION_KEYS = [_embedded_secret("FIELD_ENCRYPTION_KEY", _new_field_key)]

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000")

INSTALLED_APPS = [
    "daphne",
    # unfold without its own admin site: ours admits members (apps.owners.admin_site).
    "unfold.apps.BasicAppConfig",
    "unfold.contrib.filters",
    "apps.owners.admin_apps.PlatformAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # the docs UI's JS/CSS from static files, not a CDN
    "channels",
    "django_celery_beat",
    "apps.core",
    "apps.accounts",
    "apps.owners",
    "apps.devices",
    "apps.forwarding",
    "apps.schedules",
    "apps.api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "iotplatform.urls"
ASGI_APPLICATION = "iotplatform.asgi.application"
WSGI_APPLICATION = "iotplatform.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets the web, listener, worker and beat processes read while one writes.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    # A file, not :memory:, so that subprocesses started by tests (listener, daphne) share it.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"

# --- Channel layer ---------------------------------------------------------------------------
CHANNEL_LAYER_URL = env.str("CHANNEL_LAYER_URL", default="")
if CHANNEL_LAYER_URL.startswith(("redis://", "rediss://")):
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [CHANNEL_LAYER_URL],
                "prefix": env.str("CHANNEL_LAYER_PREFIX", default="iot"),
            },
        }
    }
elif CHANNEL_LAYER_URL in ("", "sqlite"):
    # Cross-process without a server: a second SQLite file polled by every consumer.
    DATABASES["channels"] = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(VAR_DIR / "channels.sqlite3"),
        "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL;", "timeout": 30},
        "TEST": {"NAME": str(VAR_DIR / "test-channels.sqlite3")},
    }
    DATABASE_ROUTERS = ["channels_lite.router.ChannelsRouter"]
    INSTALLED_APPS.append("channels_lite")
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_lite.layers.core.SQLiteChannelLayer",
            "CONFIG": {"database": "channels", "polling_interval": 0.05},
        }
    }
elif CHANNEL_LAYER_URL == "memory":
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    raise ImproperlyConfigured(f"CHANNEL_LAYER_URL not understood: {CHANNEL_LAYER_URL!r}")

# --- Cache (delivery rate limits, which live groups pages watch) ------------------------------
CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://")}
if CACHES["default"]["BACKEND"].endswith("LocMemCache") and EMBEDDED:
    # Shared by every process of the embedded platform.
    CACHES["default"] = {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": str(VAR_DIR / "cache"),
        # Django's default of 300 entries would cull live pages' watch marks among the
        # delivery rate-limit windows.
        "OPTIONS": {"MAX_ENTRIES": 10_000},
    }

# --- MQTT ------------------------------------------------------------------------------------
# The embedded broker listens on 1884 so that it never collides with a system Mosquitto on 1883.
MQTT_URL = env.str("MQTT_URL", default="mqtt://127.0.0.1:1884")
# The embedded broker (amqtt) speaks MQTT 3.1.1 only; Mosquitto gets MQTT 5 (receive maximum,
# session expiry) unless told otherwise.
MQTT_PROTOCOL = env.str(
    "MQTT_PROTOCOL", default="5" if env.str("MQTT_URL", default="") else "3.1.1"
)
if MQTT_PROTOCOL not in ("5", "3.1.1"):
    raise ImproperlyConfigured("MQTT_PROTOCOL must be 5 or 3.1.1")
MQTT_SHARED_GROUP = env.str("MQTT_SHARED_GROUP", default="")  # "" = plain subscription
MQTT_CLIENT_ID_PREFIX = env.str("MQTT_CLIENT_ID_PREFIX", default="iotplatform")
MQTT_MAX_PAYLOAD = env.int("MQTT_MAX_PAYLOAD", default=64 * 1024)
# Per-device broker credentials (apps.devices.broker): the Mosquitto dynamic-security admin's
# login. Without a password, credentials live in the database only (the embedded broker has no
# ACLs). The address defaults to MQTT_URL's host and port.
MQTT_ADMIN_URL = env.str("MQTT_ADMIN_URL", default="")
MQTT_ADMIN_USERNAME = env.str("MQTT_ADMIN_USERNAME", default="dynsec-admin")
MQTT_ADMIN_PASSWORD = env.str("MQTT_ADMIN_PASSWORD", default="")
# Beat removes broker logins no active credential accounts for (deletions and revocations the
# broker missed while it was down) this often; 0 = never (then `provision_broker --all`).
BROKER_PRUNE_MINUTES = env.float("BROKER_PRUNE_MINUTES", default=15.0)
INGEST_BATCH_SIZE = env.int("INGEST_BATCH_SIZE", default=500)
INGEST_BATCH_MS = env.int("INGEST_BATCH_MS", default=50)
# A device is offline after OFFLINE_FACTOR x its expected interval without any message.
DEVICE_OFFLINE_FACTOR = env.float("DEVICE_OFFLINE_FACTOR", default=3.0)

# --- Lamp control: commands and schedules (docs/schedules.md) ---------------------------------
# A published command not reported by the device within this many seconds is "unconfirmed".
COMMAND_CONFIRM_SECONDS = env.int("COMMAND_CONFIRM_SECONDS", default=10)
# How long a command for an offline device on the "queue" policy waits before it expires.
COMMAND_HOLD_SECONDS = env.int("COMMAND_HOLD_SECONDS", default=300)
COMMAND_PUBLISH_TIMEOUT = env.float("COMMAND_PUBLISH_TIMEOUT", default=5.0)
# Runs missed by less than this run late after downtime; older ones are recorded as missed.
SCHEDULE_GRACE_SECONDS = env.int("SCHEDULE_GRACE_SECONDS", default=300)
SCHEDULE_MAX_PER_DEVICE = env.int("SCHEDULE_MAX_PER_DEVICE", default=20)
# How long each beat-started runner task keeps waking for due schedules (beat starts one every 2 s).
SCHEDULE_TICK_SECONDS = env.float("SCHEDULE_TICK_SECONDS", default=2.0)
# Runs are claimed this long before their planned instant and published at it.
SCHEDULE_PREPARE_SECONDS = env.float("SCHEDULE_PREPARE_SECONDS", default=3.0)

# --- Celery ----------------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL == "filesystem://":
    _celery_dir = VAR_DIR / "celery"
    for sub in ("out", "processed", "control"):
        (_celery_dir / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_celery_dir / "out"),
        "data_folder_out": str(_celery_dir / "out"),
        "processed_folder": str(_celery_dir / "processed"),
        "control_folder": str(_celery_dir / "control"),  # not ./control in the working dir
        "store_processed": False,
        "polling_interval": 0.1,
    }
    # The same transport, with the host kombu would assume named: without one it logs "No
    # hostname was supplied" in every process at start.
    CELERY_BROKER_URL = "filesystem://localhost/"
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_TIME_LIMIT = 120
CELERY_TASK_SOFT_TIME_LIMIT = 100
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"

# --- Outbound connections (webhooks, owners' databases) ---------------------------------------
# CIDRs or host names that the egress guard lets through despite being special-purpose.
EGRESS_ALLOW = env.list("EGRESS_ALLOW", default=[])
WEBHOOK_ALLOW_HTTP = env.bool("WEBHOOK_ALLOW_HTTP", default=False)

# --- Data delivery (apps.forwarding; see docs/delivery.md) ------------------------------------
# The Celery queue of delivery tasks: "delivery" with dedicated workers (`-Q delivery`) keeps a
# burst of deliveries from queueing ahead of schedules and commands.
DELIVERY_QUEUE = env.str("DELIVERY_QUEUE", default="celery")
DELIVERY_SWEEP_SECONDS = env.float("DELIVERY_SWEEP_SECONDS", default=5.0)  # beat: due rows, leases
DELIVERY_DRAIN_SECONDS = env.float("DELIVERY_DRAIN_SECONDS", default=30.0)  # one task's budget
DELIVERY_LEASE_MARGIN = env.float("DELIVERY_LEASE_MARGIN", default=30.0)  # lease = timeout + this
# Operator caps that owners' per-destination settings cannot exceed (per second).
DELIVERY_DESTINATION_RATE = env.int("DELIVERY_DESTINATION_RATE", default=5000)
DELIVERY_OWNER_RATE = env.int("DELIVERY_OWNER_RATE", default=10000)
DELIVERY_ALERT_AFTER_MINUTES = env.float("DELIVERY_ALERT_AFTER_MINUTES", default=60.0)
DELIVERY_DISABLE_AFTER_HOURS = env.float("DELIVERY_DISABLE_AFTER_HOURS", default=72.0)
DELIVERY_RETENTION_DAYS = env.int("DELIVERY_RETENTION_DAYS", default=7)  # delivered rows, attempts
DELIVERY_DEAD_RETENTION_DAYS = env.int("DELIVERY_DEAD_RETENTION_DAYS", default=30)

# --- Retention of history (apps.core.retention); 0 days = keep forever -------------------------
TELEMETRY_RETENTION_DAYS = env.int("TELEMETRY_RETENTION_DAYS", default=90)
QUARANTINE_RETENTION_DAYS = env.int("QUARANTINE_RETENTION_DAYS", default=30)
# State transitions, finished commands, schedule runs.
HISTORY_RETENTION_DAYS = env.int("HISTORY_RETENTION_DAYS", default=365)
RETENTION_PRUNE_MINUTES = env.float("RETENTION_PRUNE_MINUTES", default=60.0)  # 0 = never

# --- Operations and demo ---------------------------------------------------------------------
# Bearer token for /metrics; empty = open (keep /metrics off the public internet then).
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# `manage.py seed_demo`: the demo login, and a platform superuser only when a password is given.
DEMO_PASSWORD = env.str("DEMO_PASSWORD", default="demo-pass")
DEMO_ADMIN_PASSWORD = env.str("DEMO_ADMIN_PASSWORD", default="")

# --- Auth, i18n, static ----------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "admin:login"
# ModelBackend plus brute-force protection (apps.api.login_throttle).
AUTHENTICATION_BACKENDS = ["apps.api.login_throttle.ThrottledModelBackend"]
LOGIN_FAILURES_PER_ACCOUNT = env.int("LOGIN_FAILURES_PER_ACCOUNT", default=5)
LOGIN_FAILURES_PER_ADDRESS = env.int("LOGIN_FAILURES_PER_ADDRESS", default=50)
LOGIN_LOCKOUT_SECONDS = env.int("LOGIN_LOCKOUT_SECONDS", default=900)
LOGIN_REDIRECT_URL = "dashboard"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(VAR_DIR / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns about a missing one
STATICFILES_DIRS = [BASE_DIR / "static"]
WHITENOISE_USE_FINDERS = True

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

# --- Logging ---------------------------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "kv": {"format": "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "kv"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "amqtt": {"level": "WARNING"},
        "transitions": {"level": "WARNING"},
    },
}

# --- Admin theme -----------------------------------------------------------------------------
UNFOLD = {
    "SITE_TITLE": "iotplatform",
    "SITE_HEADER": "iotplatform",
    "SITE_SYMBOL": "lightbulb",
    "SHOW_HISTORY": True,
    "SIDEBAR": {
        "show_search": True,
        "show_all_applications": True,
        "navigation": [
            {
                "title": "IoT platform",
                "items": [
                    {
                        "title": "Live dashboard",
                        "icon": "dashboard",
                        "link": reverse_lazy("dashboard"),
                        # Outside the admin; unfold would call "/" active on every page.
                        "active": False,
                    },
                    {
                        "title": "IoT Owners",
                        "icon": "corporate_fare",
                        "link": reverse_lazy("admin:owners_owner_changelist"),
                        "permission": "apps.owners.admin_site.is_member_or_superuser",
                    },
                    {
                        "title": "Devices",
                        "icon": "lightbulb",
                        "link": reverse_lazy("admin:devices_device_changelist"),
                        "permission": "apps.owners.admin_site.is_member_or_superuser",
                    },
                    {
                        "title": "Telemetry",
                        "icon": "monitoring",
                        "link": reverse_lazy("admin:devices_telemetry_changelist"),
                        "permission": "apps.owners.admin_site.is_member_or_superuser",
                    },
                    {
                        "title": "Transitions",
                        "icon": "swap_horiz",
                        "link": reverse_lazy("admin:devices_transition_changelist"),
                        "permission": "apps.owners.admin_site.is_member_or_superuser",
                    },
                    {
                        "title": "Quarantine",
                        "icon": "gpp_maybe",
                        "link": reverse_lazy("admin:devices_quarantinedmessage_changelist"),
                        "permission": "apps.owners.admin_site.is_member_or_superuser",
                    },
                    {
                        "title": "Users",
                        "icon": "group",
                        "link": reverse_lazy("admin:accounts_user_changelist"),
                        "permission": "apps.owners.admin_site.is_superuser",
                    },
                ],
            },
        ],
    },
}

# --- Integration API (apps.api; docs/api.md) ---------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "apps.api.schema.ApiAutoSchema",
    # Default deny: API-key auth and a scope per route; public routes opt out explicitly.
    "DEFAULT_AUTHENTICATION_CLASSES": ["apps.api.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["apps.api.auth.HasScope"],
    "EXCEPTION_HANDLER": "apps.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "iotplatform API",
    "DESCRIPTION": "Devices, telemetry, commands, schedules and data delivery of one IoT owner.",
    "VERSION": "1.0.0",
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,  # write-only secrets appear in requests only
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "CommandStatusEnum": "apps.devices.models.CommandStatus",
        "DeliveryStatusEnum": "apps.forwarding.models.Status",
        "RunStatusEnum": "apps.schedules.models.RunStatus",
    },
}
# Requests per API_RATE_WINDOW_SECONDS, per key and per owner (all its keys together).
API_RATE_PER_KEY = env.int("API_RATE_PER_KEY", default=600)
API_RATE_PER_OWNER = env.int("API_RATE_PER_OWNER", default=1200)
API_RATE_WINDOW_SECONDS = env.int("API_RATE_WINDOW_SECONDS", default=60)
API_IDEMPOTENCY_TTL_HOURS = env.float("API_IDEMPOTENCY_TTL_HOURS", default=24.0)
if API_IDEMPOTENCY_TTL_HOURS < 24:
    raise ImproperlyConfigured("API_IDEMPOTENCY_TTL_HOURS: keys are kept at least 24 hours")
