"""The demo round trip: what a newcomer sees after `make demo`."""

from pathlib import Path

from rmsd import demo_issuer
from rmsd.client import RmsClient, ServiceError, User, decrypt_content, encrypt_content, open_use_license

DOCUMENT = b"Q3 forecast: confidential, for the finance department only."


def roundtrip(url: str, issuer_dir: Path) -> int:
    client = RmsClient(url)
    say = print
    slc = client.slc()
    say(f"cluster {slc['cluster']} ({slc['role']}) at {url}")
    alice = User.new("alice@example.com", demo_issuer.token(issuer_dir, "alice@example.com"))
    bob = User.new("bob@example.com", demo_issuer.token(issuer_dir, "bob@example.com", ["finance"]))
    mallory = User.new("mallory@example.com", demo_issuer.token(issuer_dir, "mallory@example.com"))

    for user in (alice, bob, mallory):
        client.certify(user)
        say(f"RAC  issued to {user.subject}")

    content_key, blob = encrypt_content(DOCUMENT)
    published = client.publish(alice, "doc-q3-forecast", content_key, {"group:finance": ["VIEW", "PRINT"]})
    say(f"PL   {published['pl_id']} for {published['content_id']}, owner {alice.subject}, "
        f"content key wrapped to cluster key {published['key_id'][:16]}…, rights: group:finance VIEW PRINT")

    granted = client.license(bob, published["pl"])
    claims, opened_key = open_use_license(granted["ul"], slc["chain"][0], bob)
    plaintext = decrypt_content(opened_key, blob)
    say(f"UL   for {bob.subject}: rights {', '.join(claims['rights'])}; content key opened with the RAC key")
    say(f"     decrypted: {plaintext.decode()!r}")
    if plaintext != DOCUMENT:
        say("FAILED: the decrypted content differs from the original")
        return 1
    try:
        client.license(mallory, published["pl"])
    except ServiceError as err:
        if err.status != 403:
            raise
        say(f"UL   refused for {mallory.subject}: HTTP {err.status} {err.detail}")
    else:
        say(f"FAILED: {mallory.subject} got a use license without rights")
        return 1
    say("round trip OK")
    return 0
