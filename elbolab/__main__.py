from elbolab.cli import main

raise SystemExit(main())
