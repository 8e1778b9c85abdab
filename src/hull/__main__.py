import sys

from hull.cli.main import main

sys.exit(main())
