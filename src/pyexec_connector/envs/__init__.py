"""Per-script Python environments (PEP 723): a script that declares its packages in a `# /// script`
block runs in an environment holding exactly those, plus what the connector's worker needs.

    script text ──► metadata.read_block ──► requirements.plan (normalized set, key, checks)
                                                    │
                  EnvironmentManager.ensure ◄───────┘  one install per key, shared by concurrent users
                        │ uv venv + uv pip install (installer.py), into the cache (store.py)
                        ▼
                  Environment(python=...)  ──►  a zygote started with that interpreter (engine/zygote.py)

Nothing here is imported unless scriptDependencies is on or the `envs` command runs (docs/ENVIRONMENTS.md)."""
