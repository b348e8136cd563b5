"""``python -m pynorm``: self-check, then benchmark against torch (see pynorm.bench)."""
import sys

from pynorm.bench import main

sys.exit(main())
