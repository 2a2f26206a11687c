"""Standard Webhooks signing: the spec's test vector, secrets, verification."""

from __future__ import annotations

import pytest

from apps.forwarding.webhook import signing

from .receiver import expected_signature

# From the Standard Webhooks reference libraries (FACTS.md).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_it_signs_the_standard_webhooks_test_vector() -> None:
    key = signing.decode_secret(VECTOR_SECRET)
    assert signing.sign(key, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGNATURE


def test_the_test_receiver_agrees_with_the_vector() -> None:
    # The receiver's independent implementation is what checks every delivered request.
    assert expected_signature(VECTOR_SECRET, VECTOR_ID, str(VECTOR_TS), VECTOR_BODY) == (
        VECTOR_SIGNATURE
    )


def test_it_verifies_a_header_with_several_signatures() -> None:
    other = signing.generate_secret()
    header = signing.signature_header(
        [signing.decode_secret(other), signing.decode_secret(VECTOR_SECRET)],
        VECTOR_ID,
        VECTOR_TS,
        VECTOR_BODY,
    )
    assert len(header.split()) == 2
    assert signing.verify(VECTOR_SECRET, VECTOR_ID, str(VECTOR_TS), VECTOR_BODY, header)
    assert signing.verify(other, VECTOR_ID, str(VECTOR_TS), VECTOR_BODY, header)
    assert not signing.verify(VECTOR_SECRET, VECTOR_ID, str(VECTOR_TS), b"{}", header)


def test_generated_secrets_are_whsec_and_random() -> None:
    a, b = signing.generate_secret(), signing.generate_secret()
    assert a.startswith("whsec_") and a != b
    assert len(signing.decode_secret(a)) == signing.KEY_BYTES


@pytest.mark.parametrize(
    "bad", ["", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_YWJj"]
)
def test_it_refuses_malformed_secrets(bad: str) -> None:
    with pytest.raises(signing.SecretError):
        signing.decode_secret(bad)
