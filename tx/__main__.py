import sys

from tx.cli import main

sys.exit(main())
