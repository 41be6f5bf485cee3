// The Verilator (`--binary`) bench of tqt_layer_norm_row on an export's own $readmemh files: the input
// rows and expected outputs of one LayerNorm op of the golden vectors, gamma and beta from the export's
// mem/ folder. Plusargs: +input= +expect= +gamma= +beta= (files), +rows= +eps_q= +out_shift=.
// Prints `N passed, N failed` (rows whose every output equals the expected one) and `cycles N`.
module tb_layer_norm #(
    parameter int ROWS = 64,  // the most rows a run may have
    parameter int D = 64, parameter int ADDR_W = 6, parameter int IN_W = 16, parameter int GAMMA_W = 16,
    parameter int BETA_W = 49, parameter int EPS_W = 33, parameter int OUT_W = 16, parameter int K = 24,
    parameter int F = 16, parameter int ROUNDING = 2, parameter int S_W = 23, parameter int SQ_W = 37,
    parameter int W_W = 43, parameter int C_W = 23, parameter int NUM_W = 44, parameter int N_Q_W = 20,
    parameter int Y_W = 40, parameter int SHIFT_W = 8, parameter bit RECIPROCAL = 0, parameter int G = 24
);
  localparam int OUT_H = 4 * ((OUT_W + 3) / 4);
  logic clk = 0, rst = 1, start = 0, done;
  logic [15:0] row = 0;
  logic [EPS_W-1:0] eps_q;
  logic signed [SHIFT_W-1:0] out_shift;
  logic [OUT_H-1:0] expected [ROWS*D];
  string input_file, expect_file, gamma_file, beta_file;
  int rows, eps_value, shift_value, passed = 0, failed = 0, cycles = 0;

  layer_norm_bench #(.ROWS(ROWS), .D(D), .ADDR_W(ADDR_W), .IN_W(IN_W), .GAMMA_W(GAMMA_W), .BETA_W(BETA_W),
                     .EPS_W(EPS_W), .OUT_W(OUT_W), .K(K), .F(F), .ROUNDING(ROUNDING), .S_W(S_W), .SQ_W(SQ_W),
                     .W_W(W_W), .C_W(C_W), .NUM_W(NUM_W), .N_Q_W(N_Q_W), .Y_W(Y_W), .SHIFT_W(SHIFT_W),
                     .RECIPROCAL(RECIPROCAL), .G(G))
      bench (.clk(clk), .rst(rst), .start(start), .load(1'b0), .dump(1'b0), .row(row), .eps_q(eps_q), .out_shift(out_shift), .done(done));

  always #1 clk = ~clk;
  always @(posedge clk) cycles <= cycles + 1;

  initial begin
    if (!$value$plusargs("input=%s", input_file) || !$value$plusargs("expect=%s", expect_file)
        || !$value$plusargs("gamma=%s", gamma_file) || !$value$plusargs("beta=%s", beta_file)
        || !$value$plusargs("rows=%d", rows) || !$value$plusargs("eps_q=%d", eps_value)
        || !$value$plusargs("out_shift=%d", shift_value)) begin
      $display("usage: +input= +expect= +gamma= +beta= +rows= +eps_q= +out_shift=");
      $finish;
    end
    if (rows > ROWS) begin
      $display("error: %0d rows, the bench holds %0d", rows, ROWS);
      $finish;
    end
    $readmemh(input_file, bench.mem_q, 0, rows * D - 1);
    $readmemh(gamma_file, bench.mem_gamma);
    $readmemh(beta_file, bench.mem_beta);
    $readmemh(expect_file, expected, 0, rows * D - 1);
    eps_q = EPS_W'(eps_value);
    out_shift = SHIFT_W'(shift_value);
    repeat (2) @(negedge clk);  // inputs change on the falling edge: no race with the units' registers
    rst = 0;
    for (int r = 0; r < rows; r++) begin
      row = 16'(r);
      start = 1;
      @(negedge clk);
      start = 0;
      @(posedge done);
      repeat (2) @(negedge clk);  // the bench stores the last result on the edge after done
      begin
        automatic int wrong = 0;
        for (int j = 0; j < D; j++)
          if (bench.mem_out[r * D + j][OUT_W-1:0] != expected[r * D + j][OUT_W-1:0]) wrong++;
        if (wrong == 0) passed++;
        else failed++;
      end
    end
    $display("%0d passed, %0d failed", passed, failed);
    $display("cycles %0d", cycles);
    $finish;
  end
endmodule
