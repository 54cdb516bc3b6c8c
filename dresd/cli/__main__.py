import sys

from dresd.cli.main import main

sys.exit(main())
