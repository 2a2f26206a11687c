// SmartLamp per-device configuration.
//
// Copy this file to config.h (git-ignored) and fill it in for ONE device. Every lamp has its
// own DEVICE_ID and its own MQTT login: the platform provisions them (see README.md) and the
// broker only lets this login use home/<DEVICE_ID>/... topics.
#pragma once

// --- Wi-Fi -----------------------------------------------------------------------------------
#define WIFI_SSID "your-ssid"
#define WIFI_PASSWORD "your-wifi-password"

// --- Identity --------------------------------------------------------------------------------
// 1-63 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit.
// Must equal the device id registered on the platform; also used as the MQTT client id.
#define DEVICE_ID "lamp-living-room"

// --- MQTT broker -----------------------------------------------------------------------------
#define MQTT_HOST "mqtt.example.com"
#define MQTT_USE_TLS 1            // 1: TLS on 8883 (production); 0: plain TCP (lab only)
#define MQTT_PORT 8883            // 1883 without TLS
#define MQTT_USERNAME "dev-lamp-living-room"  // the credential the platform provisioned
#define MQTT_PASSWORD "paste-the-provisioned-password"
// Never ship 1 in production: it accepts any server certificate.
#define MQTT_TLS_INSECURE 0

// The CA that signed the broker's certificate (PEM). For Let's Encrypt this is ISRG Root X1.
static const char MQTT_CA_CERT[] = R"PEM(
-----BEGIN CERTIFICATE-----
...paste the CA certificate here...
-----END CERTIFICATE-----
)PEM";

// --- Hardware --------------------------------------------------------------------------------
#define RELAY_PIN 26              // GPIO driving the relay module
#define RELAY_ACTIVE_LOW 0        // 1 for the common opto-isolated modules that switch on LOW
#define BUTTON_PIN -1             // a push button to GND toggles the lamp; -1 = none
#define STATUS_LED_PIN 2          // on while connected to the broker; -1 = none

// --- Behaviour -------------------------------------------------------------------------------
#define STATUS_INTERVAL_MS 60000UL  // periodic status; the platform's "expected interval"
#define NTP_SERVER_1 "pool.ntp.org"
#define NTP_SERVER_2 "time.nist.gov"
