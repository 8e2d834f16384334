import sys

from tailor.cli.main import main

sys.exit(main())
