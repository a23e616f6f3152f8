from sbssl.cli import main

raise SystemExit(main())
