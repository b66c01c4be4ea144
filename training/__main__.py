import sys

from flaxzoo.training.cli import main

sys.exit(main())
