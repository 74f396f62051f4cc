import sys

from bd.cli import main

sys.exit(main())
