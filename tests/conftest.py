import os
import sys

# the reference model and helpers live next to the tests
sys.path.insert(0, os.path.dirname(__file__))
# the plugin sources the end-to-end tests run in the service's workers
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "plugins"))
