# Sourced by the actions' steps: turns the `set` and `output-dir` inputs (passed as environment variables, never
# interpolated into scripts) into swiftci arguments in the array SWIFTCI_ARGS, and the `expect` input into
# SWIFTCI_EXPECT_ARGS (for the stage commands only).
SWIFTCI_ARGS=()
while IFS= read -r line; do
  line="${line#"${line%%[![:space:]]*}"}"
  line="${line%"${line##*[![:space:]]}"}"
  if [ -n "$line" ]; then SWIFTCI_ARGS+=(--set "$line"); fi
done <<< "${SWIFTCI_SET:-}"
if [ -n "${SWIFTCI_OUTPUT_DIR:-}" ]; then SWIFTCI_ARGS+=(--set "output_dir=$SWIFTCI_OUTPUT_DIR"); fi
SWIFTCI_EXPECT_ARGS=()
while IFS= read -r line; do
  line="${line//[[:space:]]/}"
  if [ -n "$line" ]; then SWIFTCI_EXPECT_ARGS+=(--expect "$line"); fi
done <<< "${SWIFTCI_EXPECT:-}"
