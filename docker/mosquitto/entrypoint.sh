#!/bin/sh
# Start Mosquitto with the dynamic-security plugin, and make sure two clients exist:
#   MQTT_ADMIN_USER     manages clients and roles over $CONTROL (dynsec's own admin); the
#                       platform's broker-credential provisioning connects as this user.
#   MQTT_PLATFORM_USER  the listener and the command publisher: may subscribe to and publish on
#                       every topic, through the role "platform".
# Idempotent: it runs on every start, and the passwords in the environment always win.
set -eu

conf=${MOSQUITTO_CONF:-/mosquitto/config/mosquitto.conf}
dynsec=${MOSQUITTO_DYNSEC_FILE:-/mosquitto/data/dynamic-security.json}
port=${MOSQUITTO_PORT:-1883}
: "${MQTT_ADMIN_USER:?}" "${MQTT_ADMIN_PASSWORD:?}" "${MQTT_PLATFORM_USER:?}" "${MQTT_PLATFORM_PASSWORD:?}"

if [ ! -f "$dynsec" ]; then
  mosquitto_ctrl dynsec init "$dynsec" "$MQTT_ADMIN_USER" "$MQTT_ADMIN_PASSWORD"
fi

# Mosquitto drops root for its own user and must be able to rewrite its data (dynsec, persistence).
# The image's stock entrypoint, which this one replaces, does the same.
if [ "$(id -u)" = 0 ]; then
  chown -R mosquitto:mosquitto "$(dirname "$dynsec")"
fi

mosquitto -c "$conf" &
pid=$!
# PID 1 in the container: pass docker's SIGTERM on so that Mosquitto saves its state.
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT

# mosquitto_ctrl 2.0 exits 0 even on "Error: ..." replies: judge by the output instead.
ctrl() {
  mosquitto_ctrl -h 127.0.0.1 -p "$port" -u "$MQTT_ADMIN_USER" -P "$MQTT_ADMIN_PASSWORD" \
    dynsec "$@" 2>&1 | grep -v -e '^Warning: You are running' -e '^This means all' -e '^$' || true
}
must() {
  out=$(ctrl "$@")
  case "$out" in
    *Error*) echo "entrypoint: dynsec $1 failed: $out" >&2; kill -TERM "$pid"; exit 1 ;;
  esac
}
listed() { ctrl "$1" | grep -qx "$2"; }  # listed listClients NAME / listed listRoles NAME

tries=0
until listed listClients "$MQTT_ADMIN_USER"; do
  tries=$((tries + 1))
  if [ "$tries" -gt 60 ] || ! kill -0 "$pid" 2>/dev/null; then
    echo "entrypoint: Mosquitto did not come up (or MQTT_ADMIN_PASSWORD does not match $dynsec)" >&2
    kill -TERM "$pid" 2>/dev/null || true
    exit 1
  fi
  sleep 0.5
done

if ! listed listRoles platform; then
  must createRole platform
  must addRoleACL platform subscribePattern '#' allow
  must addRoleACL platform publishClientSend '#' allow
  must addRoleACL platform publishClientReceive '#' allow
fi
if listed listClients "$MQTT_PLATFORM_USER"; then
  must setClientPassword "$MQTT_PLATFORM_USER" "$MQTT_PLATFORM_PASSWORD"
else
  must createClient "$MQTT_PLATFORM_USER" -p "$MQTT_PLATFORM_PASSWORD"
  must addClientRole "$MQTT_PLATFORM_USER" platform
fi
echo "entrypoint: platform client '$MQTT_PLATFORM_USER' ready"

# `wait` returns early when the trap fires; wait again for Mosquitto to finish saving.
set +e
wait "$pid"
rc=$?
if kill -0 "$pid" 2>/dev/null; then
  wait "$pid"
  rc=$?
fi
exit "$rc"
