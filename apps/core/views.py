"""Health and metrics endpoints for load balancers, orchestrators and Prometheus.

- `/healthz`: liveness. Answers from the process alone (no database), so a restart loop is never
  triggered by a dependency being down.
- `/readyz`: readiness. Database, channel layer and Celery broker, each with a short timeout;
  503 with a JSON body naming what failed.
- `/metrics`: Prometheus text format, optionally behind `Authorization: Bearer <METRICS_TOKEN>`.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from . import health, metrics


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
async def readyz(request: HttpRequest) -> JsonResponse:
    results = await health.run_checks()
    ready = all(r.ok for r in results)
    body = {
        "status": "ok" if ready else "unavailable",
        "checks": {r.name: r.as_dict() for r in results},
    }
    return JsonResponse(body, status=200 if ready else 503)


def _authorized(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Constant-time comparison: the token must not leak through response timing.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not _authorized(request):
        response = HttpResponse(
            "metrics need a bearer token\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(metrics.render(), content_type=CONTENT_TYPE_LATEST)
