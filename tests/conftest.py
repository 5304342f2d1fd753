import os
import sys

# the reference model and helpers live next to the tests
sys.path.insert(0, os.path.dirname(__file__))
