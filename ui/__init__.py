"""The Gradio app: one module per tab (model_tab, dataset_tab, lowvram_tab, training_tab, advanced_tab,
estimator_tab, run_tab, and the job bar above them), assembled by page.build_app; studio.Studio does what the
buttons do in plain python. Nothing here imports torch; gradio is imported by the tab modules and build_app.

This file imports nothing: a tab module that imports `ui.form` must not load the page, and the page every tab.
"""
