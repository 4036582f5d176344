import sys

from fwdecomp.cli import main

sys.exit(main())
