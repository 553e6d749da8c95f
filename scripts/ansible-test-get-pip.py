"""Stand-in for the pip bootstrap script that ansible-test downloads from a host outside PyPI.

ansible-test runs ~/.ansible/test/cache/get_pip_<version>.py inside each new sanity
virtualenv, with the pins it wants as arguments (pip==<version> --no-setuptools ...).
This one starts from the interpreter's bundled pip (ensurepip, offline) and then
installs the requested pins from the package index like any other requirement.
"""

import subprocess
import sys


def main() -> None:
    args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
    subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--upgrade", "--force-reinstall", *args])


if __name__ == "__main__":
    main()
