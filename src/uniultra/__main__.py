from uniultra.cli import main

raise SystemExit(main())
