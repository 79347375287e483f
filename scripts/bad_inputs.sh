#!/usr/bin/env bash
# Every bad input of issue 22 through the command a user runs; prints each command, its exit code and
# the last line of stderr. Usage: scripts/bad_inputs.sh TINY_MODEL_DIR  (any small saved HF model;
# the rows that need the default model use it). Expect exit 2 and one line each; nothing under /tmp/bo*.
M=${1:?usage: scripts/bad_inputs.sh MODEL_DIR}
cd "$(dirname "$0")/.."
W=$(mktemp -d)
printf 'abc\xff\xfe\x00def' > "$W/bin.txt"; touch "$W/afile"
run() { echo "\$ rsq $*"; OMP_NUM_THREADS=1 timeout 600 python3 -m rsq "$@" >/dev/null 2>"$W/err"; echo "  exit $?: $(tail -1 "$W/err")"; }
B=(quantize "$M" --nsamples 4 --seqlen 64 --ppl-seqlen 64 --max-windows 2 --device cpu)
run "${B[@]}" --bits 5 --out "$W/o1"
run "${B[@]}" --bits 7 --out "$W/o1"
run "${B[@]}" --calib "$W/bin.txt" --out "$W/o2"
run "${B[@]}" --max-windows -1 --out "$W/o3"
run "${B[@]}" --ppl-seqlen 0 --out "$W/o4"
run eval "$M" --seqlen 0
run eval "$M" --seqlen 1 --device cpu
run eval "$M" --ppl-batch-size 0
run "${B[@]}" --out "$W/afile/sub"
run "${B[@]}" --out /proc/rsq-out
run "${B[@]}" --out /sys/rsq-out
run quantize "$M" --nsamples 4 --seqlen 100000 --device cpu --out "$W/o5"
run "${B[@]}" --device tpu --out "$W/o6"
run "${B[@]}" --grid e8p --bits 3 --out "$W/o7"
run quantize --group-size 9 --nsamples 4 --seqlen 64 --device cpu --out "$W/o8"
echo "left behind: $(cd "$W" && ls -d o* 2>/dev/null | tr '\n' ' ')"
rm -rf "$W"
