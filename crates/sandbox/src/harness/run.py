# Entry script of the forgeline sandbox harness. Kept tiny: a script is compiled on every run,
# while the modules it imports come from their pre-compiled __pycache__.
import os
import sys

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import forgeline_harness  # noqa: E402

forgeline_harness.main()
