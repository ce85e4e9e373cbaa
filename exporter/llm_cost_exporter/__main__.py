from llm_cost_exporter.cli import main

raise SystemExit(main())
