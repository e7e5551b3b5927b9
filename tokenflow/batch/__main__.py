import sys

from tokenflow.batch import main

sys.exit(main())
