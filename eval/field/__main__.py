"""`python -m eval.field`: the field benchmark (eval/field/run.py)."""
import sys

from eval.field.run import main

sys.exit(main())
