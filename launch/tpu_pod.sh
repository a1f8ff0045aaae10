#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice (the same command on
# each: bigmodel.distributed finds the workers, their ids and the coordinator
# from the TPU metadata, so no per-worker flags are needed).
#
#   launch/tpu_pod.sh --tpu=my-v5p-32 --zone=us-east5-a [--project=P] \
#       [--create --accelerator_type=v5p-32 --version=v2-alpha-tpuv5 [--spot]] \
#       [--install] [--config_from=gs://bucket/configs/my_gpt.py] [--dry_run] \
#       -- python -m bigmodel.train --config=configs/gpt.py:small --workdir=/gcs/bucket/runs/small
#
# Steps, each only when asked for:
#   --create        gcloud compute tpus tpu-vm create (the slice)
#   --install       copy this checkout to ~/bigmodel on every worker and
#                   pip-install it with jax[tpu] into ~/bigmodel/.venv
#   --config_from   copy a config file from GCS into ~/bigmodel/configs/ on
#                   every worker (then use --config=configs/NAME.py:PRESET)
#   (always)        run the command in ~/bigmodel on all workers at once
# --dry_run prints the exact commands instead of running them.
#
# The workdir must be one directory every worker sees: checkpoints are written
# cooperatively, each worker its own shards. The trainer writes through the
# local filesystem, so mount the bucket on every worker (gcsfuse, e.g. at
# /gcs/BUCKET) or use a shared filesystem (Filestore/NFS); gs:// paths as a
# workdir are not supported yet. Worker 0's output carries metrics and progress.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
}

die() {  # One error line, exit status 2 (bad input).
  echo "error: $*" >&2
  exit 2
}

tpu="" zone="" project="" accelerator_type="" version="" config_from=""
create=0 install=0 spot=0 dry_run=0
while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --config_from=*) config_from="${1#*=}" ;;
    --create) create=1 ;;
    --install) install=1 ;;
    --spot) spot=1 ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command goes after --; see --help)" ;;
  esac
  shift
done
(($#)) || die "give the command after --, e.g. -- python -m bigmodel.train --config=... --workdir=gs://..."
[[ -n "$tpu" ]] || die "--tpu=NAME is required"
[[ -n "$zone" ]] || die "--zone=ZONE is required"
if ((create)); then
  [[ -n "$accelerator_type" ]] || die "--create needs --accelerator_type (e.g. v5p-32, v4-16, v5litepod-16)"
  [[ -n "$version" ]] || die "--create needs --version (the TPU VM software image, e.g. v2-alpha-tpuv5)"
fi
if [[ -n "$config_from" && "$config_from" != gs://* ]]; then
  die "--config_from=$config_from must be a gs:// path"
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
remote_dir='~/bigmodel'  # Expanded on the workers.
common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")
archive="${TMPDIR:-/tmp}/bigmodel-src-$$.tar.gz"

quote() {  # Shell words as one copy-pasteable line, single-quoted where needed.
  local word out=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {  # Prints the command under --dry_run, runs it otherwise.
  if ((dry_run)); then
    quote "$@"
  else
    "$@"
  fi
}

on_all_workers() {  # A shell command line on every worker, at the same time.
  run gcloud compute tpus tpu-vm ssh "$tpu" "${common[@]}" --worker=all --command="$1"
}

if ((create)); then
  extra=()
  ((spot)) && extra+=(--spot)
  run gcloud compute tpus tpu-vm create "$tpu" "${common[@]}" \
    --accelerator-type="$accelerator_type" --version="$version" "${extra[@]}"
fi

if ((install)); then
  run tar -czf "$archive" -C "$repo" --exclude=.venv --exclude=.git --exclude=__pycache__ .
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:bigmodel-src.tar.gz" "${common[@]}" --worker=all
  on_all_workers "set -e; rm -rf $remote_dir; mkdir -p $remote_dir; \
tar -xzf ~/bigmodel-src.tar.gz -C $remote_dir; python3 -m venv $remote_dir/.venv; \
$remote_dir/.venv/bin/pip install -q -e $remote_dir 'jax[tpu]>=0.10.2,<0.11'"
  run rm -f "$archive"
fi

if [[ -n "$config_from" ]]; then
  on_all_workers "gcloud storage cp $(printf '%q' "$config_from") $remote_dir/configs/"
fi

command_line="$(printf '%q ' "$@" | sed 's/ $//')"
on_all_workers "cd $remote_dir && . .venv/bin/activate && $command_line"
