// The Verilator (`--binary`) bench of tqt_softmax_row on a golden-vector softmax op's $readmemh files:
// the scores [1, h, L_q, L_k], the mask and the expected probabilities. Plusargs: +scores= +visible=
// +expect= (files), +rows= (h L_q) +length= (L_k) +clamp= +shift=. Prints `N passed, N failed` (rows
// whose every probability equals the expected one) and `cycles N`.
module tb_softmax #(
    parameter int ROWS = 256,  // the most rows a run may have
    parameter int L_MAX = 64,  // the longest row a run may have
    parameter int LEN_W = 8, parameter int SC_W = 22, parameter int X_W = 24, parameter int XF_W = 27,
    parameter int Z_IN_W = 26, parameter int Z_W = 9, parameter int L_W = 38, parameter int S_W = 47,
    parameter int B_P = 8, parameter int ROUNDING = 2, parameter int SHIFT_W = 8, parameter int MAX_LEFT = 0,
    parameter longint Q_LN2 = 64'd181704, parameter longint Q_B = 64'd354684,
    parameter longint Q_C = 64'd66012017480, parameter longint MAGIC = 0, parameter int MAGIC_S = 0,
    parameter bit RECIPROCAL = 0
);
  localparam int SC_H = 4 * ((SC_W + 3) / 4), P_H = 4 * ((B_P + 3) / 4);
  logic clk = 0, rst = 1, start = 0, done;
  logic [15:0] row = 0;
  logic [LEN_W-1:0] len;
  logic signed [X_W-1:0] clamp;
  logic signed [SHIFT_W-1:0] shift;
  logic [SC_H-1:0] scores [ROWS*L_MAX];
  logic [3:0] visible [ROWS*L_MAX];
  logic [P_H-1:0] expected [ROWS*L_MAX];
  string scores_file, visible_file, expect_file;
  int rows, length, clamp_value, shift_value, passed = 0, failed = 0, cycles = 0;

  softmax_bench #(.ROWS(ROWS), .L_MAX(L_MAX), .LEN_W(LEN_W), .SC_W(SC_W), .X_W(X_W), .XF_W(XF_W),
                  .Z_IN_W(Z_IN_W), .Z_W(Z_W), .L_W(L_W), .S_W(S_W), .B_P(B_P), .ROUNDING(ROUNDING),
                  .SHIFT_W(SHIFT_W), .MAX_LEFT(MAX_LEFT), .Q_LN2(Q_LN2), .Q_B(Q_B), .Q_C(Q_C), .MAGIC(MAGIC),
                  .MAGIC_S(MAGIC_S), .RECIPROCAL(RECIPROCAL))
      bench (.clk(clk), .rst(rst), .start(start), .load(1'b0), .dump(1'b0), .row(row), .len(len), .clamp(clamp), .shift(shift),
             .done(done));

  always #1 clk = ~clk;
  always @(posedge clk) cycles <= cycles + 1;

  initial begin
    if (!$value$plusargs("scores=%s", scores_file) || !$value$plusargs("visible=%s", visible_file)
        || !$value$plusargs("expect=%s", expect_file) || !$value$plusargs("rows=%d", rows)
        || !$value$plusargs("length=%d", length) || !$value$plusargs("clamp=%d", clamp_value)
        || !$value$plusargs("shift=%d", shift_value)) begin
      $display("usage: +scores= +visible= +expect= +rows= +length= +clamp= +shift=");
      $finish;
    end
    if (rows > ROWS || length > L_MAX) begin
      $display("error: %0d rows of %0d, the bench holds %0d of %0d", rows, length, ROWS, L_MAX);
      $finish;
    end
    // the files are row-major with rows of `length`; the bench's memories have rows of L_MAX
    $readmemh(scores_file, scores, 0, rows * length - 1);
    $readmemh(visible_file, visible, 0, rows * length - 1);
    $readmemh(expect_file, expected, 0, rows * length - 1);
    for (int i = 0; i < rows * length; i++) begin
      bench.mem_score[(i / length) * L_MAX + i % length] = scores[i];
      bench.mem_visible[(i / length) * L_MAX + i % length] = visible[i];
    end
    len = LEN_W'(length);
    clamp = X_W'(clamp_value);
    shift = SHIFT_W'(shift_value);
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
        for (int j = 0; j < length; j++)
          if (bench.mem_p[r * L_MAX + j][B_P-1:0] != expected[r * length + j][B_P-1:0]) wrong++;
        if (wrong == 0) passed++;
        else failed++;
      end
    end
    $display("%0d passed, %0d failed", passed, failed);
    $display("cycles %0d", cycles);
    $finish;
  end
endmodule
