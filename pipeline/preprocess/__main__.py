import sys

from pipeline.preprocess.cli import main

sys.exit(main())
