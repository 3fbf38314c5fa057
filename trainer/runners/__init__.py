"""Everything that runs training or captioning for the app, behind one interface (base.py):

- thread.TrainingRunner: one session at a time in a worker thread of this process (what the trainer process runs);
- process.ProcessRunner: the same in a child Python (`python -m trainer.runners.process`), over a JSON pipe;
- launch.LaunchRunner: `accelerate launch` on several GPUs, followed through output.dir/events.jsonl;
- caption.CaptionRunner: captioning a folder in a child Python (`python -m trainer.runners.caption`);
- app.AppRunner: the face the UI talks to: one training at a time, in the trainer process or on several GPUs.

child.py holds what the two child processes share (start, pipes, priority, how a process ended). This file
imports nothing.
"""
