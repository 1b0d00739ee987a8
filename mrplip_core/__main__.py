from mrplip_core.cli import main

raise SystemExit(main())
