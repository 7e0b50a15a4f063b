"""Lets the training tests import their helpers (_trl_reference, _tiny) by name."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
