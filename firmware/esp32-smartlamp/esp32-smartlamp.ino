// ESP32 SmartLamp firmware: a relay switched over MQTT, speaking the platform's
// `esp32-lamp` contract (docs/protocols.md, SPEC §4.1).
//
//   home/<id>/cmd     <- {"deviceId", "action": "ON"|"OFF"|"TOGGLE", "requestId"}  (QoS 1)
//   home/<id>/status  -> {"deviceId", "power", "requestId"?, "rssi", "uptime", "fw", "ip", "ts"}
//   home/<id>/lwt     -> "ONLINE" / "OFFLINE", retained; "OFFLINE" is the MQTT will
//
// The status goes out after every (re)connect, every STATUS_INTERVAL_MS, after every command
// (echoing its requestId, which is how the platform confirms the command) and after a press
// of the optional button. The relay state survives reboots (NVS).
//
// Board: any ESP32 with Arduino-ESP32 3.x. Libraries: PubSubClient 2.8, ArduinoJson 7.
// Per-device settings live in config.h (copy config.example.h); see README.md.

#include <Arduino.h>
#include <ArduinoJson.h>
#include <Preferences.h>
#include <PubSubClient.h>
#include <WiFi.h>
#include <WiFiClientSecure.h>
#include <esp_timer.h>
#include <sys/time.h>
#include <time.h>

#include "config.h"

#define FW_VERSION "1.3.0"

#ifndef DEVICE_ID
#error "config.h must define DEVICE_ID (copy config.example.h to config.h)"
#endif
// Defaults for settings an older config.h may lack.
#ifndef MQTT_USE_TLS
#define MQTT_USE_TLS 1
#endif
#ifndef MQTT_TLS_INSECURE
#define MQTT_TLS_INSECURE 0
#endif
#ifndef RELAY_ACTIVE_LOW
#define RELAY_ACTIVE_LOW 0
#endif
#ifndef BUTTON_PIN
#define BUTTON_PIN -1
#endif
#ifndef STATUS_LED_PIN
#define STATUS_LED_PIN -1
#endif
#ifndef STATUS_INTERVAL_MS
#define STATUS_INTERVAL_MS 60000UL
#endif
#ifndef NTP_SERVER_1
#define NTP_SERVER_1 "pool.ntp.org"
#endif
#ifndef NTP_SERVER_2
#define NTP_SERVER_2 "time.nist.gov"
#endif

// --- state -----------------------------------------------------------------------------------
#if MQTT_USE_TLS
WiFiClientSecure net;
#else
WiFiClient net;
#endif
PubSubClient mqtt(net);
Preferences prefs;

static char topicCmd[96];
static char topicStatus[96];
static char topicLwt[96];

static bool powerOn = false;
static uint32_t lastStatusMs = 0;

// Reconnect with exponential backoff and jitter, so a fleet that lost its broker does not
// hammer it in lockstep when it comes back.
static const uint32_t BACKOFF_MIN_MS = 1000;
static const uint32_t BACKOFF_MAX_MS = 60000;
static uint32_t mqttBackoffMs = BACKOFF_MIN_MS;
static uint32_t nextMqttAttemptMs = 0;
static uint32_t wifiLostSinceMs = 0;

// Button debounce.
static int lastButtonLevel = HIGH;
static uint32_t buttonChangedMs = 0;
static bool buttonHandled = true;

// --- helpers ---------------------------------------------------------------------------------
static bool due(uint32_t when) {
  // Wrap-safe "millis() >= when" (millis() wraps after 49 days).
  return (int32_t)(millis() - when) >= 0;
}

static void applyRelay() {
  const bool level = powerOn != (RELAY_ACTIVE_LOW != 0);
  digitalWrite(RELAY_PIN, level ? HIGH : LOW);
}

static void setPower(bool on) {
  if (on == powerOn) return;
  powerOn = on;
  applyRelay();
  // Flash wears out: write only on an actual change.
  prefs.putBool("power", powerOn);
}

// ISO 8601 UTC with milliseconds, or false while NTP has not set the clock yet (the platform
// then uses its own reception time).
static bool isoNow(char* out, size_t size) {
  struct timeval tv;
  gettimeofday(&tv, nullptr);
  if (tv.tv_sec < 1700000000) return false;  // still 1970: not synced
  struct tm tm;
  gmtime_r(&tv.tv_sec, &tm);
  size_t len = strftime(out, size, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(out + len, size - len, ".%03ldZ", (long)(tv.tv_usec / 1000));
  return true;
}

static void publishStatus(const char* requestId) {
  JsonDocument doc;
  doc["deviceId"] = DEVICE_ID;
  doc["power"] = powerOn ? "ON" : "OFF";
  if (requestId != nullptr && requestId[0] != '\0') doc["requestId"] = requestId;
  doc["rssi"] = WiFi.RSSI();
  // esp_timer counts microseconds in 64 bits: no 49-day wrap like millis().
  doc["uptime"] = (uint32_t)(esp_timer_get_time() / 1000000LL);
  doc["fw"] = FW_VERSION;
  doc["ip"] = WiFi.localIP().toString();
  char ts[32];
  if (isoNow(ts, sizeof ts)) doc["ts"] = ts;

  char payload[320];
  size_t len = serializeJson(doc, payload, sizeof payload);
  // PubSubClient publishes at QoS 0 only; a lost status is repaired by the next periodic one,
  // and the platform's command confirmation waits for the echo with its own deadline.
  if (!mqtt.publish(topicStatus, (const uint8_t*)payload, len, false)) {
    Serial.println("[mqtt] status publish failed");
  }
  lastStatusMs = millis();
}

// --- commands --------------------------------------------------------------------------------
static void onMessage(char* topic, byte* payload, unsigned int length) {
  if (strcmp(topic, topicCmd) != 0) return;

  // Cast to const: ArduinoJson then copies the strings. PubSubClient reuses this very buffer
  // for the status we publish below, so nothing may point into it.
  JsonDocument doc;
  DeserializationError err = deserializeJson(doc, (const char*)payload, length);
  if (err) {
    Serial.printf("[cmd] ignoring a command that is not JSON: %s\n", err.c_str());
    return;
  }
  const char* target = doc["deviceId"] | DEVICE_ID;
  if (strcmp(target, DEVICE_ID) != 0) {
    Serial.printf("[cmd] ignoring a command for %s\n", target);
    return;
  }
  const char* action = doc["action"] | "";
  char requestId[65];
  strlcpy(requestId, doc["requestId"] | "", sizeof requestId);

  if (strcasecmp(action, "ON") == 0) {
    setPower(true);
  } else if (strcasecmp(action, "OFF") == 0) {
    setPower(false);
  } else if (strcasecmp(action, "TOGGLE") == 0) {
    setPower(!powerOn);
  } else {
    // No status: the platform lets the command expire, which is the truth.
    Serial.printf("[cmd] ignoring unknown action '%s'\n", action);
    return;
  }
  Serial.printf("[cmd] %s -> %s (request %s)\n", action, powerOn ? "ON" : "OFF", requestId);
  // Always answer, even when the lamp already was in that state: the platform waits for it.
  publishStatus(requestId);
}

// --- connectivity ----------------------------------------------------------------------------
static void startWifi() {
  WiFi.mode(WIFI_STA);
  WiFi.setHostname(DEVICE_ID);
  WiFi.setAutoReconnect(true);
  WiFi.begin(WIFI_SSID, WIFI_PASSWORD);
  Serial.printf("[wifi] connecting to %s\n", WIFI_SSID);
}

static void startClock() {
  // UTC: the platform converts to each owner's time zone. TLS certificate checks need it too.
  configTime(0, 0, NTP_SERVER_1, NTP_SERVER_2);
}

static bool clockSynced() {
  return time(nullptr) > 1700000000;
}

static bool connectMqtt() {
#if MQTT_USE_TLS
  if (!clockSynced()) {
    // A certificate cannot be checked without the date; try again once NTP answered.
    Serial.println("[mqtt] waiting for NTP before TLS");
    return false;
  }
#endif
  const char* user = MQTT_USERNAME[0] ? MQTT_USERNAME : nullptr;
  const char* pass = MQTT_PASSWORD[0] ? MQTT_PASSWORD : nullptr;
  Serial.printf("[mqtt] connecting to %s:%d as %s\n", MQTT_HOST, MQTT_PORT, DEVICE_ID);
  // The will: if we vanish (power cut, Wi-Fi gone), the broker publishes OFFLINE, retained.
  bool ok = mqtt.connect(DEVICE_ID, user, pass, topicLwt, 1, true, "OFFLINE", true);
  if (!ok) {
    Serial.printf("[mqtt] connect failed, state %d\n", mqtt.state());
    return false;
  }
  mqtt.publish(topicLwt, "ONLINE", true);
  mqtt.subscribe(topicCmd, 1);
  publishStatus(nullptr);
  Serial.println("[mqtt] connected");
  return true;
}

static void maintainConnections() {
  if (WiFi.status() != WL_CONNECTED) {
    if (wifiLostSinceMs == 0) wifiLostSinceMs = millis() | 1;
    // Auto-reconnect normally copes; kick it if the link stays down for long.
    if (due(wifiLostSinceMs + 30000)) {
      Serial.println("[wifi] still down, reconnecting");
      WiFi.reconnect();
      wifiLostSinceMs = millis() | 1;
    }
    return;
  }
  wifiLostSinceMs = 0;

  if (mqtt.connected()) return;
  if (!due(nextMqttAttemptMs)) return;
  if (connectMqtt()) {
    mqttBackoffMs = BACKOFF_MIN_MS;
    return;
  }
  uint32_t jitter = (uint32_t)random(0, (long)(mqttBackoffMs / 2) + 1);
  nextMqttAttemptMs = millis() + mqttBackoffMs + jitter;
  Serial.printf("[mqtt] retrying in %lu ms\n", (unsigned long)(mqttBackoffMs + jitter));
  mqttBackoffMs = min(mqttBackoffMs * 2, BACKOFF_MAX_MS);
}

static void pollButton() {
  if (BUTTON_PIN < 0) return;
  int level = digitalRead(BUTTON_PIN);
  if (level != lastButtonLevel) {
    lastButtonLevel = level;
    buttonChangedMs = millis();
    buttonHandled = false;
    return;
  }
  if (!buttonHandled && level == LOW && due(buttonChangedMs + 40)) {
    buttonHandled = true;
    setPower(!powerOn);
    Serial.printf("[button] -> %s\n", powerOn ? "ON" : "OFF");
    if (mqtt.connected()) publishStatus(nullptr);  // a local change: no requestId
  }
}

// --- Arduino entry points --------------------------------------------------------------------
void setup() {
  Serial.begin(115200);
  Serial.printf("\nSmartLamp %s, device %s\n", FW_VERSION, DEVICE_ID);

  snprintf(topicCmd, sizeof topicCmd, "home/%s/cmd", DEVICE_ID);
  snprintf(topicStatus, sizeof topicStatus, "home/%s/status", DEVICE_ID);
  snprintf(topicLwt, sizeof topicLwt, "home/%s/lwt", DEVICE_ID);

  prefs.begin("smartlamp", false);
  powerOn = prefs.getBool("power", false);
  // Level first, then output mode: the relay must not click on boot.
  applyRelay();
  pinMode(RELAY_PIN, OUTPUT);
  if (BUTTON_PIN >= 0) pinMode(BUTTON_PIN, INPUT_PULLUP);
  if (STATUS_LED_PIN >= 0) pinMode(STATUS_LED_PIN, OUTPUT);

#if MQTT_USE_TLS
#if MQTT_TLS_INSECURE
  net.setInsecure();
  Serial.println("[mqtt] WARNING: TLS without certificate verification");
#else
  net.setCACert(MQTT_CA_CERT);
#endif
#endif
  mqtt.setServer(MQTT_HOST, MQTT_PORT);
  mqtt.setCallback(onMessage);
  mqtt.setBufferSize(512);
  mqtt.setKeepAlive(30);  // the broker declares us gone ~45 s after a silent failure
  mqtt.setSocketTimeout(10);

  startWifi();
  startClock();
}

void loop() {
  maintainConnections();
  if (mqtt.connected()) {
    mqtt.loop();
    if (millis() - lastStatusMs >= STATUS_INTERVAL_MS) publishStatus(nullptr);
  }
  pollButton();
  if (STATUS_LED_PIN >= 0) digitalWrite(STATUS_LED_PIN, mqtt.connected() ? HIGH : LOW);
  delay(10);
}
