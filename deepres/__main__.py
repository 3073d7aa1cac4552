import sys

from deepres.cli import main

# guarded: data-loader workers started with spawn re-import the main module
if __name__ == "__main__":
    sys.exit(main())
