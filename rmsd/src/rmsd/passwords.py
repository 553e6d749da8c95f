"""The policy for secrets an operator chooses: cluster key passwords, trusted publishing domain passwords
and enrollment credentials. Checked when a secret is set (a new cluster, a password change, an export, a
new credential), never when an existing one is only used, so a cluster made under an older policy still
opens.

A secret is refused when it is shorter than the minimum, has fewer than MIN_DISTINCT different characters,
is one block repeated ("abcabcabcabc"), is a run of consecutive characters ("123456789012",
"abcdefghijkl"), or is a common password with digits and symbols around it ("Password2026!")."""

import re
import unicodedata

from rmsd.errors import RmsdError

MIN_LENGTH = 12
MIN_DISTINCT = 6
# Words that make up most guessed passwords; compared after lowercasing, undoing common letter-for-digit
# swaps and dropping digits and symbols.
COMMON_WORDS = frozenset({
    "password", "passwort", "wachtwoord", "qwerty", "qwertz", "azerty", "letmein", "welcome", "welkom", "admin",
    "administrator", "changeme", "secret", "geheim", "default", "master", "root", "login", "iloveyou", "monkey",
    "dragon", "football", "baseball", "sunshine", "princess", "trustno", "rmsd", "cluster", "rights",
})
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
# Runs a secret must not be a piece of (forwards or backwards, wrapping around).
RUNS = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiopasdfghjklzxcvbnm")


def weakness(secret: str, min_length: int = MIN_LENGTH) -> str | None:
    """Why `secret` is too weak, or None when it meets the policy."""
    if len(secret) < min_length:
        return f"it is shorter than {min_length} characters"
    if len(set(secret)) < MIN_DISTINCT:
        return f"it has fewer than {MIN_DISTINCT} different characters"
    if re.fullmatch(r"(.+?)\1+", secret, flags=re.DOTALL):
        return "it is one block repeated"
    folded = unicodedata.normalize("NFKC", secret).lower()
    for run in RUNS:
        around = run * (len(folded) // len(run) + 2)
        if folded in around or folded in around[::-1]:
            return "it is a run of consecutive characters"
    core = folded.strip("0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # digits and symbols around a word
    if re.sub(r"[^a-z]", "", core.translate(LEET)) in COMMON_WORDS:
        return "it is a common password with digits or symbols around it"
    return None


def check(what: str, secret: str | None, min_length: int = MIN_LENGTH) -> None:
    """RmsdError, saying why and what is asked for, when `secret` does not meet the policy."""
    if not secret:
        raise RmsdError(f"{what} is required")
    reason = weakness(secret, min_length)
    if reason:
        raise RmsdError(
            f"{what} is too weak: {reason}. Use at least {min_length} characters, not a pattern or a common "
            "password: a random string from a password manager or `openssl rand -base64 24`. Nothing was changed."
        )
