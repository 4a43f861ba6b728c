#!/usr/bin/env python3
"""ffworker's command line: `python manage.py --help`."""
from ffworker.cli import main

if __name__ == "__main__":
    main()
