from bonesoup.cli import main

raise SystemExit(main())
