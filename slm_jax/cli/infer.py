"""slm-infer: ask a trained SLM about one or more audio files."""

from __future__ import annotations

import sys

from slm_jax.cli import common

DESCRIPTION = """\
Answer a text instruction about speech with a trained adapter (greedy or beam search, batched
over the given files). Audio is read as wav/flac, resampled to 16 kHz and mixed to mono.

examples:
  slm-infer --gin_file=gin/whisper_base_smollm2.gin --checkpoint=checkpoints/whisper_base_smollm2 \\
      --audio=my.wav --instruction="Transcribe the speech."
  slm-infer --gin_file=gin/tiny.gin --checkpoint=runs/tiny --audio=a.wav --audio=b.wav \\
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
        try:
            args.instruction.encode("utf-8")
        except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
            raise common.UserError("--instruction is not valid UTF-8 text") from None
        common.check_decoding_arguments(args)
        common.setup_logging()
        common.parse_gin(args.gin_file, args.gin_bindings + overrides)
        import gin

        from slm_jax.data import audio

        from slm_jax.inference import model as inference
        data = gin.query_parameter("train.data").scoped_configurable_fn()
        # Read and check every file before loading any model: a bad file fails in a second.
        max_seconds = getattr(data, "max_audio_seconds", None)
        features = [audio.log_mel_spectrogram(audio.load_audio(p, max_seconds=max_seconds)) for p in args.audio]
        model = gin.query_parameter("train.model").scoped_configurable_fn()
        common.check_transcript_bias(args, model)
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
