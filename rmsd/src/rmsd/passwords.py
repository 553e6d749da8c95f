"""The policy for secrets an operator chooses: cluster key passwords, trusted publishing domain passwords
and enrollment credentials. Checked when a secret is set (a new cluster, a password change, an export, a
new credential), never when an existing one is only used, so a cluster made under an older policy still
opens.

A secret is refused when it is shorter than the minimum (or longer than MAX_LENGTH), has fewer than
MIN_DISTINCT different characters, is one block repeated ("abcabcabcabc"), is a run of consecutive
characters or keyboard keys ("123456789012", "abcdefghijkl", "1qaz2wsx3edc"), is on the list of common
passwords shipped with rmsd (common_passwords.txt: "qwertyuiop12"), is a common password with digits and
symbols around it ("Password2026!"), is made of common words and the words deployments are named with
("rmsd-prod-01"), or when zxcvbn, a password strength estimator that knows dictionaries, names, keyboard
patterns, dates and substitutions, finds it in fewer than MIN_GUESSES guesses ("Summer2026!!").

One bar for all three: each can be guessed offline from a copy of the configuration database or of a
backup, where nothing limits the rate but the scrypt each guess costs. A key password opens the cluster key
(PKCS#8, scrypt + AES-256, in the database), a TPD password the keys in the export, and an enrollment
credential, whose salted scrypt hash lies in the same database, gets a licensing cluster certified by the
root cluster while it is valid. An enrollment credential is made by a program and never typed, so it also
needs MIN_SECRET_LENGTH (admin.credentials) characters."""

import math
import re
import unicodedata
from functools import cache
from importlib.resources import files

from zxcvbn import zxcvbn

from rmsd.errors import RmsdError

MIN_LENGTH = 12
MAX_LENGTH = 1024  # bounds the cost of judging a secret (the pattern checks grow with the square of its length)
MIN_DISTINCT = 6
MIN_GUESSES = 10**12  # zxcvbn's estimate of the guesses an attacker needs
# zxcvbn's time grows fast with the length (a second for 200 characters): it judges the first ZXCVBN_MAX
# characters (its own default limit), which a longer secret only makes stronger.
ZXCVBN_MAX = 72
# Words that make up most guessed passwords; compared after lowercasing, undoing common letter-for-digit
# swaps and dropping digits and symbols. zxcvbn is given them too, as words it does not know otherwise.
COMMON_WORDS = frozenset({
    "password", "passwort", "wachtwoord", "qwerty", "qwertz", "azerty", "letmein", "welcome", "welkom", "admin",
    "administrator", "changeme", "secret", "geheim", "default", "master", "root", "login", "iloveyou", "monkey",
    "dragon", "football", "baseball", "sunshine", "princess", "trustno", "rmsd", "cluster", "rights",
})
# What deployments and their hosts are named after ("rmsd-prod-01"): a secret made of these and COMMON_WORDS
# only, with digits and symbols, is refused; zxcvbn is given both as words it does not know otherwise.
DEPLOYMENT_WORDS = frozenset({
    "rms", "corp", "prod", "production", "staging", "stage", "test", "dev", "live", "qa", "node", "server", "backup",
    "key", "keys", "tpd", "license", "licensing", "enroll", "enrollment", "publishing", "domain", "company",
})
NAMED_WORDS = COMMON_WORDS | DEPLOYMENT_WORDS
USER_INPUTS = sorted(NAMED_WORDS)
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
# Runs a secret must not be a piece of (forwards or backwards, wrapping around): the alphabet, the digits, and
# the rows and columns of a keyboard.
RUNS = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiopasdfghjklzxcvbnm",
        "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik,9ol.0p;/", "zaq1xsw2cde3vfr4bgt5nhy6mju7,ki8.lo9/;p0")


# The entries of 12 characters or more of the 20,000 common passwords Django ships (compiled by Royce Williams),
# under Django's BSD 3-Clause licence, which the file's header holds.
@cache
def common_passwords() -> frozenset[str]:
    """The shipped list of common passwords (lowercase), without its header (the lines up to the first blank)."""
    text = files("rmsd").joinpath("common_passwords.txt").read_text(encoding="utf-8")
    _header, _blank, entries = text.partition("\n\n")
    return frozenset(entries.splitlines())


def weakness(secret: str, min_length: int = MIN_LENGTH) -> str | None:
    """Why `secret` is too weak, or None when it meets the policy. Never names the secret."""
    if len(secret) < min_length:
        return f"it is shorter than {min_length} characters"
    if len(secret) > MAX_LENGTH:
        return f"it is longer than {MAX_LENGTH} characters"
    if len(set(secret)) < MIN_DISTINCT:
        return f"it has fewer than {MIN_DISTINCT} different characters"
    if re.fullmatch(r"(.+?)\1+", secret, flags=re.DOTALL):
        return "it is one block repeated"
    folded = unicodedata.normalize("NFKC", secret).lower()
    for run in RUNS:
        around = run * (len(folded) // len(run) + 2)
        if folded in around or folded in around[::-1]:
            return "it is a run of consecutive characters or keyboard keys"
    if secret.lower().strip() in common_passwords():
        return "it is on the list of common passwords"
    core = folded.strip("0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # digits and symbols around a word
    if re.sub(r"[^a-z]", "", core.translate(LEET)) in COMMON_WORDS:
        return "it is a common password with digits or symbols around it"
    words = re.findall(r"[^\W\d_]+", folded)  # its runs of letters
    if words and all(word in NAMED_WORDS for word in words):
        return "it is made of common words and the names deployments use, with digits or symbols"
    estimate = zxcvbn(secret[:ZXCVBN_MAX], user_inputs=USER_INPUTS, max_length=ZXCVBN_MAX)
    if estimate["guesses"] < MIN_GUESSES:
        # zxcvbn's feedback says what it found (never the secret itself), when it found something
        feedback = [estimate["feedback"]["warning"], *estimate["feedback"]["suggestions"]]
        said = " ".join(text for text in feedback if text)
        return (f"it is easy to guess: a guesser finds it in about 10^{int(math.log10(estimate['guesses']))} guesses, "
                f"fewer than the 10^{int(math.log10(MIN_GUESSES))} asked for" + (f" ({said})" if said else ""))
    return None


def check(what: str, secret: str | None, min_length: int = MIN_LENGTH) -> None:
    """RmsdError, saying why and what is asked for, when `secret` does not meet the policy."""
    if not secret:
        raise RmsdError(f"{what} is required")
    reason = weakness(secret, min_length)
    if reason:
        raise RmsdError(
            f"{what} is too weak: {reason}. Use at least {min_length} characters (at most {MAX_LENGTH}), not a pattern "
            "or a common password: a random string from a password manager or `openssl rand -base64 24`. Nothing was "
            "changed."
        )
