"""beaver_server: the REST server for a beaver database (the ``[server]`` extra).

Not implemented yet; ``python -m beaver_server`` says so and exits with status 2.
"""
import sys

if __name__ == "__main__":
    sys.exit("beaver_server: the REST server is not implemented yet")
