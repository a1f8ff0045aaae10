import os
import sys

# Tests import their shared fixtures (model_fixtures.py) as plain modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
