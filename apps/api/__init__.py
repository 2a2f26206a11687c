"""The integration API (`/api/v1/`) and the access controls around it.

Why an app of its own rather than an `api.py` in each app: the API is one contract with one set
of rules that must hold on every route — API-key authentication, scopes, idempotency keys, rate
limits, one error shape, owner scoping — and its tests prove those rules over all routes at
once. Keeping the serializers and views of every resource behind that boundary means a route
cannot be added without them. The domain logic stays where it lives: views call
`apps.devices.commands.execute_command`, `apps.schedules.actions.save_schedule`,
`apps.forwarding.actions.*` and scope every query with `apps.owners.scoping`.

API keys live here and not in `apps.accounts`: a key is the credential of an *owner* (an
integration acting for a tenant), not of a person; it keeps working when the member who made
it leaves. The browser-login throttle shares the rate-limit counters (`ratelimit.py`).
"""
