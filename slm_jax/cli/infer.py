"""slm-infer: ask a trained SLM about one or more audio files."""

from __future__ import annotations

import sys

from slm_jax.cli import common

DESCRIPTION = """\
Answer a text instruction about speech with a trained adapter (greedy or beam search, batched
over the given files). Audio is read as wav/flac, resampled to 16 kHz and mixed to mono.

examples:
  slm-infer --gin_file=gin/runs/whisper_base_smollm2.gin --checkpoint=checkpoints/whisper_base_smollm2 \\
      --audio=my.wav --instruction="Transcribe the speech."
  slm-infer --gin_file=gin/runs/tiny.gin --checkpoint=runs/tiny --audio=a.wav --audio=b.wav \\
      --instruction="Translate the speech into French." --num_beams=4
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        rest, overrides = common.split_gin_overrides(argv)
        parser = common.gin_argument_parser("slm-infer", DESCRIPTION)
        parser.add_argument("--checkpoint", required=True, help="a model directory (latest step) or a step directory")
        parser.add_argument("--audio", action="append", required=True, help="a wav/flac file (repeatable)")
        parser.add_argument("--instruction", default="Transcribe the speech.", help="the text prompt")
        common.add_decoding_arguments(parser, max_new_tokens=96)
        args = parser.parse_args(rest)
        if not args.gin_file:
            raise common.UserError("give the --gin_file the model was trained with")
        common.check_utf8("--instruction", args.instruction)
        common.check_decoding_arguments(args)
        common.setup_logging(args.verbose)
        common.parse_gin(args.gin_file, args.gin_bindings + overrides)
        import gin

        from slm_jax.data import audio

        data = gin.query_parameter("train.data").scoped_configurable_fn()
        model = gin.query_parameter("train.model").scoped_configurable_fn()
        # Check every file's length from its header before reading any samples or loading any model.
        max_seconds, why = common.max_audio_seconds(model, data)
        for p in args.audio:
            common.check_audio_file(p, max_seconds, why, prog="slm-infer")
        features = [audio.log_mel_spectrogram(audio.load_audio(p, max_seconds=max_seconds)) for p in args.audio]
        common.check_transcript_bias(args, model)
        common.check_checkpoint_matches_model(args.checkpoint, model)
        common.start_backend_quietly(tensorflow=common.data_needs_tensorflow())
        from slm_jax.inference import model as inference

        slm, step = inference.load_trained(args.checkpoint, model, data)
        answers = slm.generate(features, args.instruction, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                               no_repeat_ngram_size=args.no_repeat_ngram_size,
                               stop_on_repeated_ngram=args.stop_on_repeated_ngram,
                               transcript_bias=args.transcript_bias)
        for path, answer in zip(args.audio, answers):
            print(f"{path}\t{answer}" if len(args.audio) > 1 else answer)
        return 0

    return common.run_main("slm-infer", run)


if __name__ == "__main__":
    sys.exit(main())
