"""Demo report sections: each module has `TITLE: str` and `run(ctx: pygeo.cli.context.DemoContext) -> str` (markdown)."""
