"""Tests of beaver, in the order of beaver.py's sections."""
import subprocess
import sys

import pytest

import beaver
from beaver import BeaverDB


@pytest.fixture
def db(tmp_path):
    database = BeaverDB(tmp_path / "test.db")
    yield database
    database.close()


def test_import_without_site_packages():
    code = "import sys; sys.path.insert(0, sys.argv[1]); import beaver; print(beaver.__version__)"
    out = subprocess.run([sys.executable, "-S", "-c", code, str(__import__("pathlib").Path(beaver.__file__).parent)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == beaver.__version__


def test_dict_round_trip(db):
    config = db.dict("app_config")
    config["theme"] = "dark"
    assert config["theme"] == "dark"
    assert len(config) == 1
