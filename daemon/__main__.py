"""`python -m cloudfs.daemon`: the same as `cloudfsd`."""

import sys

from cloudfs.daemon.main import main

sys.exit(main())
