import sys

from rsq.cli.main import main

sys.exit(main())
