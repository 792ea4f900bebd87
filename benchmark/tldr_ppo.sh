#!/usr/bin/env bash
# PPO on TL;DR at full scale: see benchmark/tldr.sh. DRY_RUN=1 prints the commands.
exec bash "$(dirname "$0")/tldr.sh" ppo
