import sys

from hqpc.cli import main

sys.exit(main())
